"""Hunk-level diff parsing: the mail signature, renames, new and deleted files."""

from kpatchtest.diffparse import diff_size, parse_diff

MAIL_TAIL = """\
diff --git a/arch/x86/kvm/mmu/mmu.c b/arch/x86/kvm/mmu/mmu.c
index 1111111..2222222 100644
--- a/arch/x86/kvm/mmu/mmu.c
+++ b/arch/x86/kvm/mmu/mmu.c
@@ -10,3 +10,3 @@ static void f(void)
 a
-b
+B
 c
@@ -20,2 +20,3 @@
 x
+y

-- 
2.39.5
"""

RENAME_NEW_DEL = """\
diff --git a/old.c b/new.c
similarity index 90%
rename from old.c
rename to new.c
index 1..2 100644
--- a/old.c
+++ b/new.c
@@ -1 +1 @@
-x
+y
\\ No newline at end of file
diff --git a/added.c b/added.c
new file mode 100644
index 0000000..3333333
--- /dev/null
+++ b/added.c
@@ -0,0 +1,2 @@
+int a;
+int b;
diff --git a/gone.c b/gone.c
deleted file mode 100644
index 4444444..0000000
--- a/gone.c
+++ /dev/null
@@ -1 +0,0 @@
-int c;
"""


def test_signature_stays_out_of_the_last_hunk_and_blank_context_survives():
    (f,) = parse_diff(MAIL_TAIL)
    assert f.path == "arch/x86/kvm/mmu/mmu.c"
    assert [len(h.lines) for h in f.hunks] == [4, 3]
    assert f.hunks[1].lines[-1] == " \n"            # mailer-stripped empty context line
    assert "2.39.5" not in f.text
    assert f.hunks[0].old_range() == (10, 12)
    assert f.hunks[0].changed_new_range() == (10, 11)
    assert diff_size(MAIL_TAIL) == 3
    assert f.with_hunks([f.hunks[1]]).count("@@") == 2


def test_rename_new_and_deleted_files():
    ren, new, gone = parse_diff(RENAME_NEW_DEL)
    assert (ren.old_path, ren.new_path) == ("old.c", "new.c")
    assert ren.hunks[0].lines[-1].startswith("\\ No newline")
    assert "rename from" not in ren.renamed_to("other.c") and "+++ b/other.c" in ren.renamed_to("other.c")
    assert (new.old_path, new.new_path) == (None, "added.c")
    assert (gone.old_path, gone.new_path) == ("gone.c", None)


BINARY_THEN_TEXT = """\
diff --git a/fw.bin b/fw.bin
index 1111111..2222222 100644
GIT binary patch
delta 18
ZcmZo*Yhq(#U}R!uVc5v_i;0QhKL8z+1JeKi

delta 12
TcmZo-Yhc^N$jCIAk?}tO6q5s4

diff --git a/notes.txt b/notes.txt
index 3333333..4444444 100644
--- a/notes.txt
+++ b/notes.txt
@@ -1 +1 @@
-v1
+v2
"""


def test_binary_file_keeps_its_hunks_and_closing_empty_line():
    """git apply calls a binary patch corrupt without the empty line ending each hunk."""
    fw, notes = parse_diff(BINARY_THEN_TEXT)
    assert fw.binary and fw.hunks == [] and fw.path == "fw.bin"
    assert fw.text + notes.text == BINARY_THEN_TEXT
    assert fw.text.endswith("q5s4\n\n")
    assert diff_size(BINARY_THEN_TEXT) == 2
