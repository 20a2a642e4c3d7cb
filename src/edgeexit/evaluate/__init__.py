"""Offline evaluation: logit cache, policy sweep, per-sample records, aggregation with confidence intervals."""
