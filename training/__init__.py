"""dmdx.training: the model-agnostic pieces of ADM / ADP / DMD2 distillation.

Pure functions over tensors (losses, parametrization, samplers, discriminator heads, diagnostics, remedies), the one
ADM / DMD2 loop (``loop``) and the ADP loop (``adp``), and their accelerate plumbing (``plumbing``, ``checkpointing``,
``cli``, ``lora``). Architecture specifics come in through a teacher adapter (``dmdx.pipelines.teachers``).
"""

from .discriminator import (
    BackboneFeatures,
    DiscriminatorHead2D,
    DiscriminatorHead3D,
    DiscriminatorHeads,
    first_tensor,
    tokens_to_map,
)
from .freezing import frozen_parameters
from .losses import (
    adm_latent_predictions,
    adp_discriminator_loss,
    adp_generator_loss,
    discriminator_diagnostics,
    dmd_loss,
    fake_score_denoising_loss,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    interpolate_ode_pair,
    ode_pair_velocity,
    ode_step_target,
    per_sample_mean,
    velocity_regression_loss,
)
from .parametrization import (
    PREDICTION_TYPES,
    NoiseSchedule,
    apply_cfg,
    normalize_prediction_type,
    schedule_from_scheduler_config,
)
from .samplers import (
    adm_noise_levels,
    backward_simulate,
    cubic_timesteps,
    renoise_mode,
    student_timesteps,
    uniform_timesteps,
)

__version__ = "0.1.0"
