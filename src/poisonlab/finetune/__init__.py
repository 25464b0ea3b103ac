"""Fine-tuning backdoors (PROTOCOL §4-5): poisoned instruction data, supervised fine-tuning on
the shared training step, ASR/CA/NTA with pluggable judges, vendor export and endpoints, and
persistence under further training."""
