"""Where models and prompts come from: the embedded default, local folders and GGUF files, built-in
and user prompt sets."""
