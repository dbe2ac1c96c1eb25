"""Golden-output regression harness: cases, runner, backends, filters, goldens."""
