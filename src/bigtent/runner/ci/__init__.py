"""Nix CI: projects from git, webhooks and polling, evaluation, one build per evaluation
(docs/ci.md).

The settings (``[[projects]]``, ``[evaluation]``) are ``bigtent.config.ci``; ``webhooks.py``
(signature and payload checks, pure), ``triggers.py`` (event -> what to evaluate, trust,
supersede: pure), ``evaluator.py`` (the one Nix process that enumerates and instantiates the
jobs, bounded in memory and time), ``service.py`` (queue, claim, evaluate, admit, watch,
report), ``routes.py`` (the HTTP API).
"""
