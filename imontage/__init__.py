"""imontage: distributed training of diffusion transformers for sets of images and videos."""
