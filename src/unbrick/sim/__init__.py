"""Virtual devices: flash model, boot chain, fault injection, recovery interfaces."""
