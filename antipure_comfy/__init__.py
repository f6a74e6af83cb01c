"""The pack's adapters to ComfyUI: the host's MODEL / VAE / CLIP / IMAGE as the core's interfaces.

The only package of the pack that imports the host (through :mod:`.comfy_host`);
the node classes in ``nodes/`` call one function of it each. Importing this
package itself imports nothing from the host.
"""
