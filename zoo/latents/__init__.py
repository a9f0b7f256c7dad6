"""Latent tooling: the VAE, LPIPS, the PCA of teacher features."""
