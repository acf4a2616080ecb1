//! `client gen-certs`: a private CA, one certificate per node of the config (server and peer
//! client in one, naming every host the node answers on), and one client certificate. For
//! trying TLS and mTLS out, and for small deployments; bigger ones use their own PKI.

use std::net::IpAddr;
use std::path::Path;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// Writes `ca.pem`, `ca-key.pem`, `node-K.pem`/`node-K-key.pem` for each `(id, hosts)`, and
/// `client.pem`/`client-key.pem` into `out`. Keys are written owner-only.
pub fn generate(out: &Path, nodes: &[(u64, Vec<String>)]) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = Vec::new();

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sequencer cluster CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    write(out, "ca.pem", ca.pem().as_bytes(), false, &mut written)?;
    write(
        out,
        "ca-key.pem",
        ca.key().serialize_pem().as_bytes(),
        true,
        &mut written,
    )?;

    for (id, hosts) in nodes {
        let mut names = hosts.clone();
        names.push("localhost".into());
        names.sort();
        names.dedup();
        let (cert, key) = leaf(&ca, &format!("sequencer node {id}"), &names)?;
        write(
            out,
            &format!("node-{id}.pem"),
            cert.as_bytes(),
            false,
            &mut written,
        )?;
        write(
            out,
            &format!("node-{id}-key.pem"),
            key.as_bytes(),
            true,
            &mut written,
        )?;
    }
    let (cert, key) = leaf(&ca, "sequencer client", &[])?;
    write(out, "client.pem", cert.as_bytes(), false, &mut written)?;
    write(out, "client-key.pem", key.as_bytes(), true, &mut written)?;
    Ok(written)
}

/// A certificate for both ends of a TLS connection, valid for `names` (IPs or DNS names).
fn leaf(
    ca: &CertifiedIssuer<'_, KeyPair>,
    common_name: &str,
    names: &[String],
) -> anyhow::Result<(String, String)> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    for name in names {
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.clone().try_into()?),
        };
        params.subject_alt_names.push(san);
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    secret: bool,
    written: &mut Vec<String>,
) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    // `mode` applies only to a new file; an old key file keeps its mode otherwise.
    use std::os::unix::fs::PermissionsExt;
    let mode = if secret { 0o600 } else { 0o644 };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    written.push(path.display().to_string());
    Ok(())
}
