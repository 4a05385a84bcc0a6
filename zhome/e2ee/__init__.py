"""End-to-end encryption: device keys, one-time and fallback keys, to-device messages, device lists."""
