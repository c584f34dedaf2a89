"""Side-by-side benchmark of rollguard against a bare floor, a naive proxy, nginx and MLServer."""
