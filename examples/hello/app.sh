#!/bin/sh
# Prints the greeting baked in at build time: "<GREETING>, <name>!".
echo "$(cat /app/greeting), ${1:-world}!"
