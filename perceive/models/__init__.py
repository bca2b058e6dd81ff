"""The models, a folder each (``upn/``, ``chatrex/``), and the parts they share, a file each."""
