"""Network parts shared by methods: heads, ViT helpers, synchronised BatchNorm."""
