"""Wan 2.1 (text- and image-to-video) as an imontage model family: its record in ``family.py``, its
model (``model.py``, weights loadable from diffusers by name) imported only when built."""
