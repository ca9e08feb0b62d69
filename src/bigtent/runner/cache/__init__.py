"""The binary cache: what may enter it, NAR checks and signing, where NAR files live."""
