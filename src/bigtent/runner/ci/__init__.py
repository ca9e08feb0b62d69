"""Nix CI: projects from git, webhooks and polling, evaluation, one build per evaluation
(docs/ci.md).

The settings (``[[projects]]``, ``[evaluation]``) are ``bigtent.config.ci``; ``webhooks.py``
(signature and payload checks, pure), ``triggers.py`` (event -> what to evaluate, trust,
supersede: pure), ``evaluator.py`` (the one Nix process that enumerates and instantiates the
jobs, bounded in memory and time), ``projects.py`` (the projects in the database), ``refs.py``
(ls-remote, polls, manual triggers), ``evaluation.py`` (evaluate, upload the closure, admit the
build), ``reports.py`` (what the forge is told), ``queue.py`` (every state change of an
evaluation: one conditional update), ``service.py`` (when: triggers, supersede, cancel, rerun,
watch, the loop), ``routes.py`` (the HTTP API).
"""
