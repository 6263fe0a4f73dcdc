"""Policies: the schema, reading and validating files, and compiling them into components."""

from attrctl.policy.compile import CompiledAttribute, CompiledPolicy, compile_policy
from attrctl.policy.load import (
    apply_override,
    bundled_policies_dir,
    bundled_policy_names,
    load_policy,
    resolve_policy_ref,
)
from attrctl.policy.schema import Attribute, Policy

__all__ = [
    "Attribute",
    "CompiledAttribute",
    "CompiledPolicy",
    "Policy",
    "apply_override",
    "bundled_policies_dir",
    "bundled_policy_names",
    "compile_policy",
    "load_policy",
    "resolve_policy_ref",
]
