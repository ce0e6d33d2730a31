"""imontage's own DiT: one model family among the others (its record: ``family.py``; the model:
``model.py``)."""
