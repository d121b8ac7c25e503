#!/bin/sh
# Writes a Redis ACL file from users.acl.example with real passwords, stored as SHA-256
# hashes (the file never holds a clear password).
#   make-acl.sh PRODUCER_PASSWORD_FILE WORKER_PASSWORD_FILE OPERATOR_PASSWORD_FILE > users.acl
set -eu
here=$(cd "$(dirname "$0")" && pwd)
[ $# -eq 3 ] || { echo "usage: $0 PRODUCER_PW_FILE WORKER_PW_FILE OPERATOR_PW_FILE" >&2; exit 2; }
hash() {
    pw=$(head -n 1 "$1" | tr -d '\r\n')
    [ -n "$pw" ] || { echo "make-acl.sh: $1 is empty" >&2; exit 1; }
    printf '%s' "$pw" | sha256sum | cut -d' ' -f1
}
p=$(hash "$1"); w=$(hash "$2"); o=$(hash "$3")
sed -e "s/>CHANGE-ME-producer/#$p/" -e "s/>CHANGE-ME-worker/#$w/" -e "s/>CHANGE-ME-operator/#$o/" \
    "$here/users.acl.example" | grep -v '^#' | grep -v '^$'
