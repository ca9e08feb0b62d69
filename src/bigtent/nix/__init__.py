"""Pure implementations of Nix's formats: nix-base32, store paths, NAR, narinfo, keys and .drv."""
