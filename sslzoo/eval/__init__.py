"""What a pretrained backbone is worth: kNN, linear / MLP probes, fine-tuning with label
fractions, few-shot, robustness to corruptions, collapse metrics, per-group accuracy, and the
report that puts them together (``sslzoo eval PROTOCOL --ckpt RUN.ckpt``, :mod:`.cli`).

Nothing is imported here, so the callbacks can use the metrics without loading the methods."""
