"""What a serving engine needs around the online detector: per-request options and records."""
