"""HunyuanVideo (diffusers' ``HunyuanVideoTransformer3DModel``) as an imontage model family: its
record in ``family.py``, its model (``model.py``) imported only when built."""
