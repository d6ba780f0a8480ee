"""Nomad backend groundwork: parameterized job specs (variants) and their HCL rendering.

- `variants`: which job a phase of a job config runs on (`VariantSpec`, `variant_id`).
- `escape`: HCL / Go-template escaping; every value that reaches a job file goes through it.
- `render`: `render_job(phase, spec, params)` -> HCL, from `templates/nomad/job.nomad.hcl.j2`.
"""

from jobforge.nomad.render import RenderParams, render_job
from jobforge.nomad.variants import (
    VariantSpec,
    default_spec,
    job_name,
    variant_id,
    variant_spec,
)

__all__ = ["RenderParams", "VariantSpec", "default_spec", "job_name", "render_job", "variant_id", "variant_spec"]
