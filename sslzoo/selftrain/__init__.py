"""Self-training after fine-tuning: a fine-tuned classifier teaches a student on the unlabeled
training images, by distillation (SimCLR v2) or noisy student training."""
