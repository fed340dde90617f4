__version__ = "0.1.0"

#: Version of the on-disk checkpoint format written by :meth:`DiffusionPrior.save`.
CHECKPOINT_FORMAT_VERSION = 1
