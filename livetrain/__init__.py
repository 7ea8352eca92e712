"""livetrain: train the language model you are serving, in place, while it serves."""
