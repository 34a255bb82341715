//! The words every layer shares: which protocol a request speaks, which operation it is, which
//! way a body flows, which end of an exchange is which, and how bodies and transfers end. Each is
//! a closed set that owns its label string, so metrics, logs and JSON spell it one way, and
//! metric labels can only ever come from here.

/// A closed set whose variants name themselves: the enum, `ALL` in declaration order (metrics
/// index by it), and `as_str`, the label value.
macro_rules! closed_set {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident => $label:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vmeta])* $variant,)* }

        impl $name {
            pub const ALL: [$name; [$($label),*].len()] = [$($name::$variant),*];

            /// The label value, as metrics and logs show it.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $label,)* }
            }
        }
    };
}

closed_set! {
    /// Which protocol family a request belongs to.
    pub enum Api {
        V1 => "v1",
        V2 => "v2",
        Other => "other",
    }
}

/// `Operation`, each variant with its label and the `Api` it belongs to.
macro_rules! operations {
    ($($variant:ident => $label:literal, $api:ident;)*) => {
        closed_set! {
            /// Every registry operation regscope tells apart.
            pub enum Operation { $($variant => $label,)* }
        }

        impl Operation {
            pub fn api(self) -> Api {
                match self { $(Operation::$variant => Api::$api,)* }
            }
        }
    };
}

operations! {
    VersionCheck => "version_check", V2;
    ManifestGet => "manifest_get", V2;
    ManifestHead => "manifest_head", V2;
    ManifestPut => "manifest_put", V2;
    ManifestDelete => "manifest_delete", V2;
    BlobGet => "blob_get", V2;
    BlobHead => "blob_head", V2;
    BlobDelete => "blob_delete", V2;
    UploadStart => "upload_start", V2;
    UploadStartMonolithic => "upload_start_monolithic", V2;
    BlobMount => "blob_mount", V2;
    UploadChunk => "upload_chunk", V2;
    UploadFinish => "upload_finish", V2;
    UploadStatus => "upload_status", V2;
    UploadCancel => "upload_cancel", V2;
    TagsList => "tags_list", V2;
    Referrers => "referrers", V2;
    Catalog => "catalog", V2;
    StorageGet => "storage_get", Other;
    StorageHead => "storage_head", Other;
    AuthToken => "auth_token", Other;
    V1Ping => "v1_ping", V1;
    V1RepositoryPut => "v1_repository_put", V1;
    V1RepositoryImagesGet => "v1_repository_images_get", V1;
    V1RepositoryImagesPut => "v1_repository_images_put", V1;
    V1TagsGet => "v1_tags_get", V1;
    V1TagPut => "v1_tag_put", V1;
    V1ImageJsonGet => "v1_image_json_get", V1;
    V1ImageJsonPut => "v1_image_json_put", V1;
    V1LayerGet => "v1_layer_get", V1;
    V1LayerPut => "v1_layer_put", V1;
    V1ChecksumPut => "v1_checksum_put", V1;
    V1AncestryGet => "v1_ancestry_get", V1;
    V1Search => "v1_search", V1;
    Other => "other", Other;
}

closed_set! {
    /// Which way a body flows.
    pub enum Direction {
        /// Client → registry (request bodies).
        Upload => "upload",
        /// Registry → client (response bodies).
        Download => "download",
    }
}

impl Direction {
    /// The party that produces this body's bytes.
    pub fn source(self) -> Side {
        match self {
            Direction::Upload => Side::Client,
            Direction::Download => Side::Registry,
        }
    }

    /// The party that consumes this body's bytes.
    pub fn sink(self) -> Side {
        match self {
            Direction::Upload => Side::Registry,
            Direction::Download => Side::Client,
        }
    }
}

closed_set! {
    /// One end of the proxied exchange.
    pub enum Side {
        Client => "client",
        Registry => "registry",
    }
}

closed_set! {
    /// How a body's life ended.
    pub enum BodyEnd {
        /// The source signalled end of stream and the sink took everything.
        Complete => "complete",
        /// The source failed mid-stream (connection reset, short body): the source aborted.
        SourceError => "source_error",
        /// The sink stopped asking for frames before the end: the sink aborted (or gave up).
        SinkDropped => "sink_dropped",
        /// The source sent nothing for the stall timeout: regscope cut the body off.
        SourceStalled => "source_stalled",
    }
}

closed_set! {
    /// Why an upstream exchange failed.
    pub enum UpstreamErrorKind {
        ConnectRefused => "connect_refused",
        ConnectTimeout => "connect_timeout",
        Tls => "tls",
        Reset => "reset",
        ResponseTimeout => "response_timeout",
        Other => "other",
    }
}

closed_set! {
    /// Push or pull.
    pub enum TransferDirection {
        Push => "push",
        Pull => "pull",
    }
}

closed_set! {
    /// How a transfer ended.
    pub enum Outcome {
        Complete => "complete",
        Incomplete => "incomplete",
        Failed => "failed",
    }
}

closed_set! {
    /// Who an instant of a transfer belongs to: every instant goes to exactly one.
    pub enum Party {
        /// The client: working between requests, or slow to send or to read.
        Client => "client",
        /// The registry: processing, or slow to send or to read.
        Registry => "registry",
        /// Bytes moving. Its label value is `transfer`, as the image-level metrics name it.
        Moving => "transfer",
        /// The object storage or CDN a registry redirected a blob to.
        Storage => "storage",
        /// The token service a registry sent the client to (its `WWW-Authenticate` realm).
        Auth => "auth",
    }
}

closed_set! {
    /// Who ended an attempt that failed: the time it cost is lost to them.
    pub enum Culprit {
        /// The client closed the connection or stopped sending (it gave up, or was killed).
        Client => "client",
        /// The registry answered an error, reset the connection, or did not answer in time.
        Registry => "registry",
        /// The storage a registry redirected to did.
        Storage => "storage",
        /// regscope's own limits cut it off (a stalled body, an overloaded proxy).
        Regscope => "regscope",
    }
}

closed_set! {
    /// How an attempt failed.
    pub enum FailureCause {
        /// An error status (5xx, or a 4xx other than an auth challenge or a probe's 404).
        ErrorStatus => "error_status",
        /// The connection went away mid-exchange, or could not be made.
        ConnectionLost => "connection_lost",
        /// No answer in time.
        Timeout => "timeout",
        /// A body sent nothing for the stall timeout, or regscope refused for lack of room.
        Limit => "limit",
    }
}

closed_set! {
    /// What became of a registry's redirect to another host.
    pub enum Redirected {
        /// Rewritten to a regscope handle: the bytes come through regscope.
        Captured => "captured",
        /// Passed to the client as it was (`--redirects pass`): regscope does not see the bytes.
        Passed => "passed",
    }
}

closed_set! {
    /// Why spans were not exported.
    pub enum SpanDrop {
        /// The export queue was full (the collector is slower than the traffic, or down).
        QueueFull => "queue_full",
        /// The export request failed: no connection, no answer in time, or an error status.
        ExportFailed => "export_failed",
        /// The collector accepted the request but rejected these spans.
        Rejected => "rejected",
    }
}

closed_set! {
    /// A phase of one blob's (v1: one image's) upload.
    pub enum Phase {
        Start => "start",
        Transfer => "transfer",
        Commit => "commit",
        /// Between the upload's requests: nothing of it on the wire (the client working).
        Gap => "gap",
        Total => "total",
    }
}

impl Operation {
    /// Who answers this operation upstream: the registry, or the storage a registry redirected to.
    pub fn upstream(self) -> Party {
        match self {
            Operation::StorageGet | Operation::StorageHead => Party::Storage,
            Operation::AuthToken => Party::Auth,
            _ => Party::Registry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Operation;

    #[test]
    fn operation_names_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for op in Operation::ALL {
            let name = op.as_str();
            assert!(seen.insert(name), "duplicate {name}");
            assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
        }
    }
}
