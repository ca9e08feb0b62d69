"""Cache retention (docs/cache.md): what to keep (``policy``, pure), when paths were last used
(``usage``), pins (``pins``), and the collector that marks and sweeps (``collector``)."""
