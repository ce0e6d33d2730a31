"""What produces training data, above :mod:`imontage.data` (which only reads it).

``encode`` pre-encodes image and video shards into latent shards with a family's VAE and text
encoders (``tools/encode_shards.py``), ``synthetic`` draws the embedded synthetic tasks
(``tools/make_synthetic.py``), and ``testing`` writes the small, odd and broken shards the tests read.
"""
