"""The offline pipeline on a transformers model: scan, calibrate, select heads, measure a policy's
effect, and write reports and figures."""
