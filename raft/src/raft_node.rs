pub struct RaftNode; pub struct RaftConfig;
