"""unbrick: bring dead devices back and keep fleets on the right firmware."""

__version__ = "0.1.0"
