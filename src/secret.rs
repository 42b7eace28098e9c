//! Shared secrets as the nodes and the witness read them from files.

/// A secret file's contents minus one trailing `\n` or `\r\n` (editors add one; the nodes and
/// the witness must agree on the bytes).
pub fn strip_line_end(data: &mut Vec<u8>) {
    if data.last() == Some(&b'\n') {
        data.pop();
        if data.last() == Some(&b'\r') {
            data.pop();
        }
    }
}
