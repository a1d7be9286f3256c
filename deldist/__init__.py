"""deldist: distributed data curation for endoscopy video on Ray."""
__version__ = "0.1.0"
