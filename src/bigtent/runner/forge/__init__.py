"""Reporting to forges (GitHub check runs, Forgejo/Gitea commit statuses).

``model.py`` is the interface the CI side (projects, evaluations) and the reporting side share:
what an evaluation's report says, independent of any forge.
"""
