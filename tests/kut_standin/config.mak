# Stand-in for the config.mak that kvm-unit-tests' ./configure writes (x86_64 host).
# deploy_kut rewrites SRCDIR and ERRATATXT to the deployed directory, as for a real tree.
SRCDIR=/nonexistent/kvm-unit-tests
PREFIX=/usr/local
HOST=x86_64
ARCH=x86_64
ARCH_NAME=x86_64
TEST_DIR=x86
TEST_SUBDIR=x86
PRETTY_PRINT_STACKS=no
ENVIRON_DEFAULT=yes
ERRATATXT=/nonexistent/kvm-unit-tests/errata.txt
CONFIG_EFI=
