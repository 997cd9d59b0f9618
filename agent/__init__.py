"""vcpu-agent: watch every libvirt vCPU on a host and publish its transitions to MQTT."""

__version__ = "0.1.0"
