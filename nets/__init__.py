"""The networks, a leaf package (the networks issue builds it)."""
