"""What the host and SecVF's guest init agree on (the guest side is ``guest/init.sh``)."""

#: The line the guest init prints on the serial console (ttyS0) once the guest is up.
READY_MARKER = "SECVF-READY"
