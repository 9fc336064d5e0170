"""Built-in backend plugins (installed as megahet.backends), one module each: cpu, cuda, npu, sim.

They are found through the entry-point group "megahet.backends" like any third-party plugin; use
megahet.device.get_backend(name) rather than importing these modules directly.
"""
