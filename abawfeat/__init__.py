"""abawfeat: facial affect analysis for ABAW / Aff-Wild2 in two stages.

Stage one (``abawfeat.extract``) runs a frozen encoder over every face crop once and writes an HDF5 feature
cache; stage two (``abawfeat.train``) trains light heads on the cached sequences in seconds to minutes.
The library never imports the CLI (``abawfeat.cli``) or ``pipelines/``.
"""

__version__ = "0.1.0"
