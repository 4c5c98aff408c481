"""CLI commands: each module defines ``register(app)`` adding one thin command over the library."""
