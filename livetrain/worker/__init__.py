"""The training worker: the process that serves a training session over ZMQ (its protocol,
server and client connection), and how a parent starts and stops it."""
