"""The ``deepspec features`` stage: the optional offline cache of target hidden states (local or s3)."""
