"""Human caption rankings: the pairs they imply, preference files, and staged preference sets."""
