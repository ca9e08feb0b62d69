"""Configuration: TOML files plus ``BIGTENT_<SECTION>__<KEY>`` environment overrides.

Every tuning constant lives here with its documented default (docs/configuration.md), one
module per part of the file: ``runner`` (``[runner]``, ``[database]``, ``[scheduler]`` and
``RunnerConfig``), ``cache``, ``auth``, ``ssh`` (with the pure URI and host-key parsers of
``sshuri``), ``autoscale``, ``ci`` (``[[projects]]``, ``[evaluation]``), ``forge`` and
``agent``; ``base`` is what they share. Secrets may be given as ``*_file`` keys, read when
needed (``bigtent.secretfile``). Validation errors become ``ConfigError`` messages that name
the key, the value and what to do.

This package imports nothing from ``bigtent.runner`` or ``bigtent.agent``: both import it.
"""

from bigtent.config.agent import (
    AgentConfig,
    AgentSection,
    EphemeralSection,
    OidcProvider,
    load_agent_config,
)
from bigtent.config.auth import AuthSection, OidcIssuerSection, Role, TokenEntry
from bigtent.config.autoscale import AutoscaleSection, GithubPoolSection
from bigtent.config.base import is_loopback, split_comma_list, split_listen
from bigtent.config.cache import (
    CacheSection,
    RetentionPolicySection,
    RetentionSection,
    S3Section,
    UntrustedRetentionSection,
    Upstream,
)
from bigtent.config.ci import EvaluationSection, ProjectSection
from bigtent.config.forge import ForgeSection
from bigtent.config.runner import (
    DashboardAuth,
    DatabaseSection,
    MetricsAuth,
    RunnerConfig,
    RunnerSection,
    SchedulerSection,
    TlsSection,
    load_runner_config,
    ssh_builder_warnings,
)
from bigtent.config.ssh import SshBuilderSection

__all__ = [
    "AgentConfig",
    "AgentSection",
    "AuthSection",
    "AutoscaleSection",
    "CacheSection",
    "DashboardAuth",
    "DatabaseSection",
    "EphemeralSection",
    "EvaluationSection",
    "ForgeSection",
    "GithubPoolSection",
    "MetricsAuth",
    "OidcIssuerSection",
    "OidcProvider",
    "ProjectSection",
    "RetentionPolicySection",
    "RetentionSection",
    "Role",
    "RunnerConfig",
    "RunnerSection",
    "S3Section",
    "SchedulerSection",
    "SshBuilderSection",
    "TlsSection",
    "TokenEntry",
    "UntrustedRetentionSection",
    "Upstream",
    "is_loopback",
    "load_agent_config",
    "load_runner_config",
    "split_comma_list",
    "split_listen",
    "ssh_builder_warnings",
]
