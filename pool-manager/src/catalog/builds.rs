//! The catalog's build records beyond the template rows (build logs' size, the build
//! queue): kept apart from the catalog's core tables.

use super::{Catalog, CatalogError};
use rusqlite::params;

impl Catalog {
    /// Bytes of command output (`stdout` and `stderr` lines, not the build's own
    /// `build` lines) a template's build log holds: what its byte cap counts.
    pub fn build_log_output_bytes(&self, template_id: &str) -> Result<u64, CatalogError> {
        let db = self.db.lock().unwrap();
        // LENGTH of a TEXT counts characters; of a BLOB, bytes.
        let bytes: i64 = db.query_row(
            "SELECT COALESCE(SUM(LENGTH(CAST(text AS BLOB))), 0) FROM build_logs
             WHERE template_id = ?1 AND stream != 'build'",
            params![template_id],
            |r| r.get(0),
        )?;
        Ok(bytes.max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_bytes_count_bytes_of_output_lines_only() {
        let dir = std::env::temp_dir().join(format!(
            "catalog-builds-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let c = Catalog::open(&dir.join("catalog.db")).unwrap();
        assert_eq!(c.build_log_output_bytes("tpl-a").unwrap(), 0);
        c.append_build_log(
            "tpl-a",
            &[
                (None, "build", "step 0 (run): echo".into()),
                (Some(0), "stdout", "héllo".into()),
                (Some(0), "stderr", "oops".into()),
            ],
        )
        .unwrap();
        c.append_build_log("tpl-b", &[(Some(0), "stdout", "other".into())])
            .unwrap();
        // "héllo" is 6 bytes (é is two), "oops" 4; the build line is not output.
        assert_eq!(c.build_log_output_bytes("tpl-a").unwrap(), 10);
        let _ = std::fs::remove_dir_all(dir);
    }
}
