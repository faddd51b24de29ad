"""The bottom layer: registries, errors, config helpers, the device mesh, process set-up.

Nothing here knows about diffusion, networks, data or tasks; every other layer may
import it.
"""
