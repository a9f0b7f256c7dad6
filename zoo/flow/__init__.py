"""The flow maths: interpolants, time samplers, integrators, guidance."""
